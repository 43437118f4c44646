# chatnode node image: `chatnode serve` by default; `docker run <image> migrate` for migrations.
# Build: docker build -t chatnode .   (docker-compose.yml builds it for node1, node2, migrate)

# -- build stage: compile mysqlclient against MariaDB Connector/C, install into a venv -------
FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential pkg-config default-libmysqlclient-dev \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/chatnode/venv
# chatnode is installed in editable mode from /opt/chatnode/src and that tree is what the
# runtime image runs; the schema `chatnode migrate` applies is package data (chatnode/adapters/).
WORKDIR /opt/chatnode/src
# README.md* : the readme is optional for the build (the glob may match nothing).
COPY pyproject.toml README.md* ./
COPY chatnode ./chatnode
RUN /opt/chatnode/venv/bin/pip install -e ".[cluster]" \
 && /opt/chatnode/venv/bin/python -m compileall -q chatnode

# -- runtime stage: venv + source tree from the build stage, the client library, no compiler --
FROM python:3.11-slim
# libmariadb3 carries the caching_sha2_password plugin too (MySQL 8 accounts).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libmariadb3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/chatnode --create-home \
      --shell /usr/sbin/nologin chatnode \
 && install -d -o chatnode -g chatnode -m 0755 /run/chatnode
COPY --from=build /opt/chatnode /opt/chatnode
ENV PATH=/opt/chatnode/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHATNODE_HOST=0.0.0.0 \
    CHATNODE_PORT=8080 \
    CHATNODE_DATA_DIR=/var/lib/chatnode/data
USER chatnode
WORKDIR /var/lib/chatnode
EXPOSE 8080
# SIGTERM drains (closes WebSockets with 4000 "reconnect", flushes the archiver): give it
# CHATNODE_DRAIN_TIMEOUT_S plus a margin (docker stop -t / compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatnode"]
CMD ["serve"]
