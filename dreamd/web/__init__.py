"""The web viewer: the dream in any browser (and in wallpaper apps with `?kiosk=1`).

`server.py` runs it inside `dreamd run` (uvicorn in its own thread), `hub.py` carries
the frames the display writer swaps onto the screen to every open page, `app.py` holds
the routes and `static/` the page. Nothing here imports torch.
"""
