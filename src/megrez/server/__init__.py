"""The OpenAI-compatible server (``megrez serve``): ``engine_loop`` drives the engine from a
background thread, ``protocol`` validates requests and shapes responses, ``app`` holds the
FastAPI routes and ``cli`` the command. FastAPI is imported only by ``app``."""
