"""One-time conversion of raw datasets to FFCV (.beton) and DALI (webdataset tar + .idx) formats, with a manifest."""

# This folder is the package fastlivt.data_prep (the link fastlivt/data_prep points here; the wheel installs it there and
# nowhere else). Imported by the top-level name a checkout on sys.path also offers, it would be a second copy of every
# module (for the kernels, a second registration of the torch.library op): refused.
if __name__ != "fastlivt.data_prep":
    raise ImportError(f"import fastlivt.data_prep, not {__name__}: this folder is importable only as fastlivt.data_prep")
