"""The ingress stage (ingest/): unit tests of the app and signature, and the real ingress process."""
