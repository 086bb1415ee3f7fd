"""OpenVINO pieces behind ``tangquant export``: the IR directory and the exact INT4 hand-off."""
