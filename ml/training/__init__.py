"""Training: data, losses, the loop and its configs. Nothing in ml.inference imports this."""
