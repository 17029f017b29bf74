"""edgeai-operator: runs deep neural networks across device, edge and cloud nodes."""

__version__ = "0.1.0"

API_GROUP = "edgeai.dev"
API_VERSION = "v1alpha1"
TIERS = ("device", "edge", "cloud")
TIER_LABEL = "edgeai.dev/tier"
ZONE_LABEL = "topology.kubernetes.io/zone"
GFLOPS_ANNOTATION = "edgeai.dev/gflops"
UPLINK_MBPS_ANNOTATION = "edgeai.dev/uplink-mbps"
UPLINK_RTT_MS_ANNOTATION = "edgeai.dev/uplink-rtt-ms"
POWER_WATTS_ANNOTATION = "edgeai.dev/power-watts"
