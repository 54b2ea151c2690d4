"""`gptlab ui`: one page from a text file to a trained model you can sample and share.

Modules: `workspace` (the app's folders: uploads, prepared data, runs; every name from the browser
is checked here), `jobs` (training as separate `gptlab train` processes, one at a time, with a
queue; state read back from the run folders), `share` (export zips, GGUF, the Hub), `api` (the
job-control HTTP routes), `page` (the Gradio Blocks) and `app` (the server: the page, /ui/api and
the OpenAI-compatible /v1 of `gptlab serve`).
"""
