"""The device stage: runtime-adaptive split, change-detection skip, feature noise, privacy.

* Adaptive split (Neurosurgeon/JALAD style): the plan precomputes one split per uplink
  bandwidth range. The device holds every prefix it may need, measures the uplink (a
  probe at start, then every forward: bytes / (round trip - time the next stage says it
  spent)), and per request runs the prefix of the split whose range holds the estimate.
  The next stage holds the matching suffixes and picks one by the tensor names it gets.
* Change detection: a frame whose mean absolute difference to the last processed frame,
  relative to that frame's value range, is below the threshold is answered with the last
  result and counted as skipped.
* Privacy: with `raw_input_stays_on_device`, splits that would forward the raw input are
  never chosen; Gaussian noise (sigma = `feature_noise_std`) is added to the features
  sent upstream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeai_worker.config import ConfigError, SplitOption, WorkerConfig
from edgeai_worker.metrics import WorkerMetrics
from edgeai_worker.protocol import Array, InferResponse
from edgeai_worker.runtime import Partition

UPLINK_SMOOTHING = 0.3  # weight of the newest uplink sample in the moving average
STEP_FACTOR = 2.0  # a sample this many times off the estimate replaces it


@dataclass
class Split:
    option: SplitOption
    partition: Partition | None  # None: forward the raw input
    label: str


class DeviceStage:
    def __init__(
        self,
        config: WorkerConfig,
        splits: Sequence[Split],
        metrics: WorkerMetrics,
    ) -> None:
        if not splits:
            raise ConfigError("splits", "the device stage has no split to run")
        allowed = [
            s for s in splits if s.partition is not None or not config.raw_input_stays_on_device
        ]
        if not allowed:
            raise ConfigError(
                "privacy.rawInputStaysOnDevice",
                "every split forwards the raw input",
                "a plan with at least one layer on the device",
            )
        self.splits = sorted(allowed, key=lambda s: s.option.min_mbps)
        self.threshold = config.skip_unchanged_threshold
        self.noise_std = config.feature_noise_std
        self.fixed_uplink = config.uplink_mbps
        self.uplink_mbps: float | None = config.uplink_mbps
        self._rng = np.random.default_rng(config.noise_seed)
        self._metrics = metrics
        if self.uplink_mbps is not None:
            metrics.uplink_mbps.set(self.uplink_mbps)
        self.last_sample_at = float("-inf")
        self._held: float | None = None  # an outlying sample waiting for confirmation
        self._last_frame: Array | None = None
        self._last_response: InferResponse | None = None
        self.frames = 0
        self.skipped = 0

    # -------------------------------------------------------------- adaptive split

    def choose(self) -> Split:
        """The split for the current uplink estimate (the first one before any estimate)."""
        mbps = self.uplink_mbps
        if mbps is None:
            return self.splits[0]
        for split in self.splits:
            if split.option.min_mbps <= mbps < split.option.max_mbps:
                return split
        # Outside every range: the split whose range is nearest.
        return min(
            self.splits,
            key=lambda s: min(abs(mbps - s.option.min_mbps), abs(mbps - s.option.max_mbps)),
        )

    def observe_uplink(self, mbps: float) -> None:
        """Fold one bandwidth sample into the estimate: a moving average of samples within
        2x of it; a sample further off is held back, and a second one on the same side
        replaces the estimate with their mean (a step change in the link, not a stall)."""
        if self.fixed_uplink is not None or not math.isfinite(mbps) or mbps <= 0:
            return
        self.last_sample_at = time.monotonic()
        estimate = self.uplink_mbps
        if estimate is None:
            self.uplink_mbps = mbps
        elif estimate / STEP_FACTOR <= mbps <= estimate * STEP_FACTOR:
            self.uplink_mbps = estimate + UPLINK_SMOOTHING * (mbps - estimate)
            self._held = None
        elif self._held is not None and (self._held > estimate) == (mbps > estimate):
            self.uplink_mbps = (self._held + mbps) / 2
            self._held = None
        else:
            self._held = mbps
        if self.uplink_mbps is not None:
            self._metrics.uplink_mbps.set(self.uplink_mbps)

    def needs_probe(self, interval_s: float) -> bool:
        """Whether the estimate is stale: no sample for `interval_s` (the chosen split may
        send too little to measure, or nothing at all)."""
        if self.fixed_uplink is not None:
            return False
        return time.monotonic() - self.last_sample_at >= interval_s

    @property
    def awaiting_confirmation(self) -> bool:
        """An outlying sample is held: measure again now rather than at the next interval."""
        return self._held is not None

    def probe_size_bytes(self) -> int:
        """About 50 ms of traffic at the current estimate, within [32 KiB, 512 KiB]."""
        mbps = self.uplink_mbps if self.uplink_mbps is not None else 10.0
        return int(min(512 * 1024, max(32 * 1024, mbps * 1e6 / 8 * 0.05)))

    def observe_transfer(self, sent_bytes: int, elapsed_s: float, server_s: float) -> None:
        """Fold one forward into the uplink estimate. Small bodies say little about
        bandwidth (latency dominates), so only bodies over 16 KiB count."""
        network_s = elapsed_s - server_s
        if sent_bytes >= 16 * 1024 and network_s > 0:
            self.observe_uplink(sent_bytes * 8 / network_s / 1e6)

    # -------------------------------------------------------------- change detection

    def unchanged(self, frame: Array) -> InferResponse | None:
        """The previous response if `frame` barely differs from the last processed one."""
        self.frames += 1
        self._metrics.frames.inc()
        previous = self._last_frame
        hit: InferResponse | None = None
        if (
            self.threshold > 0
            and previous is not None
            and self._last_response is not None
            and previous.shape == frame.shape
            and frame.dtype.kind in "biuf"
        ):
            current = frame.astype(np.float64, copy=False)
            value_range = float(previous.max() - previous.min()) or 1.0
            change = float(np.mean(np.abs(current - previous))) / value_range
            if change < self.threshold:
                hit = self._last_response
        if hit is not None:
            self.skipped += 1
            self._metrics.skipped_frames.inc()
        self._metrics.skip_rate.set(self.skip_rate)
        return hit

    def remember(self, frame: Array, response: InferResponse) -> None:
        if self.threshold > 0 and frame.dtype.kind in "biuf":
            self._last_frame = frame.astype(np.float64)
            self._last_response = response

    @property
    def skip_rate(self) -> float:
        return self.skipped / self.frames if self.frames else 0.0

    # -------------------------------------------------------------- privacy

    def add_noise(self, features: dict[str, Array]) -> dict[str, Array]:
        if self.noise_std <= 0:
            return features
        noisy: dict[str, Array] = {}
        for name, array in features.items():
            if array.dtype.kind == "f":
                noise = self._rng.normal(0.0, self.noise_std, size=array.shape)
                noisy[name] = (array + noise).astype(array.dtype)
            else:
                noisy[name] = array
        return noisy
