"""Federated fine-tuning: FedKSeed and FedAvg of adapters, run as Flower apps."""
