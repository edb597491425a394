"""DICOM/PACS pipeline: DICOM series in (folder or DICOMweb), DICOM SEG out, rules, QA, a local Orthanc."""
