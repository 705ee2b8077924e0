"""ComfyUI nodes of the pack (thin: validate inputs, call dopsd_core). Only imported inside ComfyUI."""
