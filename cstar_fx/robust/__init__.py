"""Adversarial robustness: attacks, adversarial losses, fine-tuning, CSTAR's joint training, evaluation."""
