"""Decoding built from the model's parts: MTP speculative decoding (speculative.py, report §5.4.3) and the
router's choices shown in the text (routing.py)."""
