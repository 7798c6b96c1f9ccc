"""The REST API (Falcon under waitress), served by the daemon."""
