"""Terminal and matplotlib views of analysis results."""
