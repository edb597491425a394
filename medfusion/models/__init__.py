"""Networks built from encoders + fusion heads (segmenter, classifier)."""
