"""Distributed training of a zoo model across workers: an aggregator (parameter server)
for syncSGD, asyncSGD, EASGD, FedAvg and codistillation, peer-to-peer gossip, update
compression with error feedback and DP-SGD. `python -m edgeai_worker.training --help`."""
