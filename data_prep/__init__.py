"""One-time conversion of raw datasets to FFCV (.beton) and DALI (webdataset tar + .idx) formats, with a manifest."""
