"""The server behind ``tangquant serve``: HTTP API, generation engine, request schema, web page."""
