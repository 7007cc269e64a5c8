"""ECG intake (WFDB, DICOM waveform, HL7 aECG), measurements and traces. Not built yet."""
