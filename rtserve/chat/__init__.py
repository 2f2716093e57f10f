"""`rtserve chat`: a terminal chat against any OpenAI-compatible server (session.py speaks the protocol
and measures each answer; cli.py is the prompt_toolkit + rich terminal front end)."""
