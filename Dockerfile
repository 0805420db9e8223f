FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLUXBOT_DATA_DIR=/data

RUN useradd --create-home --uid 10001 fluxbot \
    && mkdir -p /data && chown fluxbot:fluxbot /data && chmod 700 /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY cogs ./cogs
RUN pip install .

USER fluxbot
VOLUME ["/data"]
# SIGTERM is what `docker stop` sends; the bot finishes within 5 s of it.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "bot"]
