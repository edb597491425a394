"""Application layer above evaluation (as MONAI's monai/apps): pipelines built from the core, e.g. DICOM/PACS."""
