"""Retraining job: self-supervised contrastive training of the STN embedder and its export to model_repo/."""
