"""The bench parts bench.py runs, one file each (python bench.py --parts=NAME); common.py holds what they
share."""
