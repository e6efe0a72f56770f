"""Backbones and the split between the frozen body and the finetuned head."""
