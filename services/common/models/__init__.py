"""Network definitions shared by the Triton models, training and evaluation."""
