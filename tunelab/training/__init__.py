"""The training loop and what only it uses: step checkpoints, the batch stream, the optimizer and
schedule, and the run's final output (`final`)."""
