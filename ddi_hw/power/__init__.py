"""Power meters, logging and energy per inference (the measured half of the loop)."""
