"""One process, no parallelism: a trained checkpoint loaded as a plain model, and text sampled from it."""
