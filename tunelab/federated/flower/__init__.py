"""The federated algorithms as Flower apps (flwr, the `federated` extra): `apps` holds the
ServerApp and ClientApp Flower runs in its own processes; `launch` starts a SuperLink and N
SuperNodes on this machine and submits the run (`tunelab federate x.yaml`)."""
