"""Response headers that browsers and security scanners expect on every response.

The feed page sets its own Content-Security-Policy (it runs its script); every
other response is data, which may never be framed, sniffed or run.
"""

HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
]
DATA_CSP = "default-src 'none'; frame-ancestors 'none'"


def init_app(app):
    @app.after_request
    def _secure(response):
        for name, value in HEADERS:  # (Headers.add: cheaper than extend or setdefault)
            response.headers.add(name, value)
        if "Content-Security-Policy" not in response.headers:
            response.headers["Content-Security-Policy"] = DATA_CSP
        return response
