"""Anchor E of DESIGN §12: a bare Flask app that only parses and echoes the JSON it
is sent, served by the same gunicorn configuration as the service:

    gunicorn -c gunicorn.conf.py "bench.echo:app"
"""
from flask import Flask, request

app = Flask(__name__)


@app.post("/api/data/ingest")
def echo():
    return request.get_json()
