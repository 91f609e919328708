"""Model and dataset cards, and pushing trained adapters to the Hugging Face Hub."""
