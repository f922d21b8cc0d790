"""Adapters in use: which adapter a user means (adapters), the prompt as training rendered it (prompts), generation
beside the base model from one copy of it (chat), and scoring (evaluate)."""
