FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml setup.cfg README.md ./
COPY service ./service
RUN pip install --no-cache-dir . && useradd --system --no-create-home taskrunner
USER taskrunner
ENV TASK_RUNNER_HOST=0.0.0.0
EXPOSE 3030
# The worker drains on SIGTERM within TASK_RUNNER_SHUTDOWN_GRACE (20 s by default).
STOPSIGNAL SIGTERM
CMD ["task-runner", "api"]
