"""Jobs over rows: one prompt asked of many rows, in real time (``--map``) or through DashScope's Batch API (``--batch``)."""
