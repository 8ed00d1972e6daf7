"""Evaluation: perplexity, fidelity against a reference, multiple-choice tasks, cost on the machine at hand."""
