"""Built-in demo models: the seeded corpus and the training script that produced the shipped weights."""
