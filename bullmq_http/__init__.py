"""The service's plain Python: everything but its HTTP face (app.py). See the README's
Development section for what each module holds."""
