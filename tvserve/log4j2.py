"""tvserve's logging for TorchServe's frontend (log4j2), used when a config sets
`tvserve_lean_logs=true`.

TorchServe's own configuration logs every request about a dozen times at DEBUG and INFO, each
line twice (its loggers add to the root logger's console and ts_log appenders): on 2 cores the
frontend spent about 6.5 ms of CPU per request of the book's Net, more than the model. This one
keeps the same files, each line once: every request in access_log.log, TorchServe's metrics in
ts_metrics.log and model_metrics.log, the workers' output in model_log.log, and TorchServe's
own messages from INFO up in ts_log.log, less the per-request ones of its batch aggregator and
jobs; warnings and errors also go to the console (console.log).
"""

ROLLING_FILE = """
    <RollingFile name="{name}" fileName="${{env:{folder}:-logs}}/{name}.log"
                 filePattern="${{env:{folder}:-logs}}/{name}.%d{{dd-MMM}}.log.gz">
      <PatternLayout pattern="{pattern}"/>
      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>
      <DefaultRolloverStrategy max="5"/>
    </RollingFile>"""
PLAIN, DETAILED = "%d{ISO8601} - %m%n", "%d{ISO8601} [%-5p] %t %c - %m%n"
FILES = {"access_log": ("LOG_LOCATION", PLAIN), "model_log": ("LOG_LOCATION", DETAILED),
         "ts_log": ("LOG_LOCATION", DETAILED), "model_metrics": ("METRICS_LOCATION", PLAIN),
         "ts_metrics": ("METRICS_LOCATION", PLAIN)}
LOGGERS = [  # (logger, level, appender); none adds to the root logger's appenders
    ("ACCESS_LOG", "info", "access_log"), ("MODEL_LOG", "info", "model_log"),
    ("MODEL_METRICS", "info", "model_metrics"), ("TS_METRICS", "info", "ts_metrics"),
    ("org.pytorch.serve", "info", "ts_log"), ("org.pytorch.serve.wlm.BatchAggregator", "warn", "ts_log"),
    ("org.pytorch.serve.job", "warn", "ts_log"), ("io.netty", "error", "ts_log"),
]


def log4j2_xml() -> str:
    appenders = "".join(ROLLING_FILE.format(name=name, folder=folder, pattern=pattern)
                        for name, (folder, pattern) in FILES.items())
    loggers = "".join(f'\n    <Logger name="{name}" level="{level}" additivity="false"><AppenderRef ref="{ref}"/>'
                      f'<AppenderRef ref="console" level="warn"/></Logger>' for name, level, ref in LOGGERS)
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="console" target="SYSTEM_OUT"><PatternLayout pattern="{DETAILED}"/></Console>{appenders}
  </Appenders>
  <Loggers>{loggers}
    <Logger name="org.apache" level="off"/>
    <Root level="warn"><AppenderRef ref="console"/><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""
