"""The web page of app.py (issue #24): every mode of sample.py in a browser, on a model loaded once.

Entry points: Models (the server's list of runs, each loaded once), the handlers (plain functions: sample, inpaint,
img2img, interpolate, invert, condition; each returns a Result with the picture, the equivalent sample.py command
and the files written), and build_ui(models), the Gradio page (imports Gradio only when called)."""
from webapp.handlers import Result, condition, img2img, inpaint, interpolate, invert, painted_mask, sample
from webapp.models import Models, RunError
from webapp.requests import RequestError
from webapp.uploads import MAX_UPLOAD_BYTES, MAX_UPLOAD_PIXELS, UploadError, check_upload


def build_ui(models: Models):
    """The Gradio Blocks of the page, queued (webapp/ui.py)."""
    from webapp.ui import build_ui as build
    return build(models)


__all__ = ["MAX_UPLOAD_BYTES", "MAX_UPLOAD_PIXELS", "Models", "RequestError", "Result", "RunError", "UploadError",
           "build_ui", "check_upload", "condition", "img2img", "inpaint", "interpolate", "invert", "painted_mask",
           "sample"]
