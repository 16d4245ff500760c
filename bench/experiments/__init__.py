"""Long measurements of the method (not in `make bench`): quality.py, about 35 minutes."""
