"""One module per DVC stage or command: read inputs, call the domain, account, publish.

Stage modules import the domain packages and ``ctcurate.io``, never each other."""
