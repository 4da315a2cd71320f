"""The benchmark: `python -m bench` (or `make bench`) writes bench/results/latest.*."""
