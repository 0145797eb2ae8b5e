"""From feature pairs to numbers: anomaly maps and the evaluation step (maps), windows of large
images (tiling), an evaluation pass reduced batch by batch (passes), the metrics (metrics,
binned, aupimo), thresholds and calibration.json (thresholds), the category router."""
