"""One module per group of `tunequeue` commands; each handler takes the parsed arguments and returns an exit
code, or raises `Refused` (`ClientError` in `files` and `jobs`, which talk to a server over HTTP only) with a
message that says what to do."""
