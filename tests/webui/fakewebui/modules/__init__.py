"""A fake of the A1111 1.10.1 ``modules`` package: only what VAE Batch touches, written for these
tests from ../shared/docs/webui-reference.md (section numbers are cited where behaviour matters).
Nothing here is webui code; the live tests (VAEBATCH_WEBUI_URL) check the same behaviour for real."""
