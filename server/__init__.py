"""ESS Serve: the HTTP shell around `safety_decoding`."""
