# The benchmark's trivial WSGI app under gunicorn (threads: keep-alive clients are served).
exec python -m gunicorn --bind "127.0.0.1:$CDSW_APP_PORT" --workers 2 --threads 8 \
  --worker-class gthread --keep-alive 30 --access-logfile - --log-level warning wsgi_app:app
