package tvserve.plugin;

import com.sun.net.httpserver.HttpExchange;
import com.sun.net.httpserver.HttpServer;
import java.io.IOException;
import java.io.InputStream;
import java.net.ConnectException;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.URI;
import java.net.URISyntaxException;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.net.http.HttpTimeoutException;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.Connector;
import org.pytorch.serve.util.ConnectorType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import tvserve.plugin.ProtocolEndpoint.ClientError;

/**
 * The console at an address of its own (config `tvserve_console_address`, which `tvserve serve`
 * passes as TVSERVE_CONSOLE_ADDRESS): a JDK HttpServer in the frontend's JVM that serves the page's
 * own files with no key (ConsoleFiles: they hold no secret) and relays every other request to the
 * inference port as the browser sent it, its Authorization header included. TorchServe checks the
 * key there exactly as for any client, and the page stays same-origin.
 *
 * <p>Why: TorchServe 0.12 checks `Authorization: Bearer KEY` on every path of the inference port
 * before any plugin sees the request, the page's files included, and a browser opening a page cannot
 * send that header (docs/operating.md, "The console").
 *
 * <pre>
 * GET /                          302 to /console/
 * GET /console/, /console/{console.js,console.css}, /console/samples/{name}   the files, no key
 * anything else                  relayed to the inference port: method, path and query, headers, body
 * </pre>
 *
 * <p>Started once, by the first ConsoleEndpoint constructed, before any TorchServe port listens. An
 * address it cannot serve, or an inference listener it cannot relay to (https, a Unix socket), stops
 * the server with one line saying what to do (Refused).
 */
final class ConsoleAddress {
    static final String ADDRESS_ENV = "TVSERVE_CONSOLE_ADDRESS";
    static final String PROPERTY = "tvserve_console_address"; // the config key, for messages
    static final Duration CONNECT_TIMEOUT = Duration.ofSeconds(5); // the inference port is on this machine
    static final Duration ANSWER_TIMEOUT = Duration.ofMinutes(5); // above TorchServe's default_response_timeout (120 s)
    static final int THREADS = 8; // a few tabs' calls at once; more wait in the server's queue
    /** Headers of this hop only, or that the JDK's HttpClient and HttpServer set themselves: not relayed either way. */
    static final Set<String> HOP_HEADERS = Set.of("connection", "content-length", "expect", "host", "upgrade",
            "keep-alive", "transfer-encoding", "te", "trailer", "proxy-connection", "http2-settings", "date");
    private static final Logger logger = LoggerFactory.getLogger(ConsoleAddress.class);
    private static boolean started;

    private final URI inference;
    private final int maxRequestSize;
    private final HttpClient client;

    private ConsoleAddress(URI inference, int maxRequestSize) {
        this.inference = inference;
        this.maxRequestSize = maxRequestSize;
        this.client = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1) // TorchServe speaks no h2c
                .connectTimeout(CONNECT_TIMEOUT).followRedirects(HttpClient.Redirect.NEVER).build();
    }

    /** Starts the console's own server where TVSERVE_CONSOLE_ADDRESS names one, once per process. */
    static synchronized void startOnce() {
        if (started) {
            return;
        }
        started = true;
        String address = System.getenv(ADDRESS_ENV);
        if (address == null || address.isEmpty()) {
            return;
        }
        try {
            InetSocketAddress listen = listenAddress(address);
            ConsoleAddress relay = new ConsoleAddress(inferenceAddress(), ConfigManager.getInstance().getMaxRequestSize());
            serve(listen, address, relay);
            logger.info("tvserve plugin: the console at {}/console/, relaying to the inference port {}",
                    address.replaceAll("/+$", ""), relay.inference);
        } catch (Refused e) {
            logger.error("tvserve plugin: {}", e.getMessage());
            throw e;
        }
    }

    /** ("127.0.0.1", 8079) from "http://127.0.0.1:8079"; refused for anything else. */
    static InetSocketAddress listenAddress(String address) {
        URI uri;
        try {
            uri = new URI(address);
        } catch (URISyntaxException e) {
            throw refused(PROPERTY + "=" + address + " is not an address: write http://HOST:PORT.");
        }
        if (!"http".equals(uri.getScheme()) || uri.getHost() == null || uri.getPort() < 0
                || !(uri.getPath() == null || uri.getPath().isEmpty() || uri.getPath().equals("/"))) {
            throw refused(PROPERTY + "=" + address + ": write http://HOST:PORT (plain HTTP, no path; "
                    + "for TLS, put a proxy that ends it in front of the console).");
        }
        return new InetSocketAddress(uri.getHost(), uri.getPort());
    }

    /** Where the relay reaches TorchServe's inference listener: its own address, loopback for 0.0.0.0. */
    static URI inferenceAddress() {
        Connector listener = ConfigManager.getInstance().getListener(ConnectorType.INFERENCE_CONNECTOR);
        if (listener.isSsl() || listener.isUds()) {
            throw refused("the console's relay speaks plain HTTP over TCP, and the inference address is "
                    + (listener.isSsl() ? "https" : "a Unix socket") + ": unset " + PROPERTY
                    + " and serve the console on the inference port (tvserve_console=true) behind a proxy "
                    + "that adds the key, or give the inference port plain HTTP.");
        }
        InetSocketAddress socket = (InetSocketAddress) listener.getSocketAddress();
        InetAddress host = socket.getAddress().isAnyLocalAddress() ? InetAddress.getLoopbackAddress() : socket.getAddress();
        try {
            return new URI("http", null, host.getHostAddress(), socket.getPort(), null, null, null);
        } catch (URISyntaxException e) {
            throw refused("cannot form the inference port's URL from " + socket + ": " + e.getMessage());
        }
    }

    /** Binds `listen` (`address`, for messages) and serves on daemon threads: the console never keeps the JVM running. */
    private static void serve(InetSocketAddress listen, String address, ConsoleAddress relay) {
        HttpServer server;
        try {
            server = HttpServer.create(listen, 0);
        } catch (IOException e) {
            throw refused("cannot listen on " + address + " (" + e.getMessage() + "): free that port "
                    + "or set " + PROPERTY + " to another.");
        }
        ExecutorService pool = Executors.newFixedThreadPool(THREADS, task -> {
            Thread thread = new Thread(task, "tvserve-console");
            thread.setDaemon(true);
            return thread;
        });
        server.setExecutor(pool);
        server.createContext("/", relay::handle);
        Thread starter = new Thread(server::start); // the server's dispatcher thread inherits daemon from its starter
        starter.setDaemon(true);
        starter.start();
        try {
            starter.join();
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }

    private void handle(HttpExchange exchange) throws IOException {
        try {
            String path = exchange.getRequestURI().getRawPath();
            if (path == null || !path.startsWith("/")) {
                throw new ClientError(400, "The request names no path: the console serves /console/.");
            }
            boolean get = "GET".equals(exchange.getRequestMethod());
            ConsoleFiles.Page page = get ? pageFile(path) : null;
            if (get && path.equals("/")) {
                exchange.getResponseHeaders().set("Location", "/console/");
                send(exchange, 302, new byte[0]);
            } else if (page != null) {
                exchange.getResponseHeaders().set("Content-Type", page.type());
                exchange.getResponseHeaders().set("Cache-Control", ConsoleFiles.CACHE_CONTROL);
                send(exchange, 200, page.bytes());
            } else {
                relay(exchange, path);
            }
        } catch (ClientError e) {
            ProtocolEndpoint.REJECTED.labels(ConsoleEndpoint.PROTOCOL, Integer.toString(e.status)).inc();
            sendError(exchange, e.status, e.getMessage());
        } finally {
            exchange.close();
        }
    }

    /** The page file `path` names (ConsoleFiles), or null where it names none: that request is relayed. */
    private static ConsoleFiles.Page pageFile(String path) throws ClientError, IOException {
        if (!(path.equals("/console") || path.startsWith("/console/"))) {
            return null;
        }
        return ConsoleFiles.find(ProtocolEndpoint.segments(path));
    }

    /** Sends the request on to the inference port and its answer back: status, headers, body. */
    private void relay(HttpExchange exchange, String path) throws IOException, ClientError {
        byte[] body = body(exchange);
        String query = exchange.getRequestURI().getRawQuery();
        HttpRequest.Builder request = HttpRequest.newBuilder(URI.create(inference + path + (query == null ? "" : "?" + query)))
                .timeout(ANSWER_TIMEOUT)
                .method(exchange.getRequestMethod(), body.length == 0
                        ? HttpRequest.BodyPublishers.noBody() : HttpRequest.BodyPublishers.ofByteArray(body));
        for (Map.Entry<String, List<String>> header : exchange.getRequestHeaders().entrySet()) {
            if (!HOP_HEADERS.contains(header.getKey().toLowerCase())) {
                header.getValue().forEach(value -> request.header(header.getKey(), value));
            }
        }
        HttpResponse<byte[]> answer;
        try {
            answer = client.send(request.build(), HttpResponse.BodyHandlers.ofByteArray());
        } catch (HttpTimeoutException e) {
            sendError(exchange, 504, "The inference port at " + inference + " did not answer within "
                    + ANSWER_TIMEOUT.toSeconds() + " s; retry, or look at TorchServe's logs for a stuck worker.");
            return;
        } catch (ConnectException e) {
            sendError(exchange, 502, "The console cannot reach the inference port at " + inference
                    + ": TorchServe's inference listener is not up (starting or stopping); retry in a moment.");
            return;
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            sendError(exchange, 503, "The console is stopping; retry.");
            return;
        } catch (IOException e) {
            sendError(exchange, 502, "The console's call to the inference port at " + inference + " failed ("
                    + e.getClass().getSimpleName() + ": " + e.getMessage() + "); retry.");
            return;
        }
        for (Map.Entry<String, List<String>> header : answer.headers().map().entrySet()) {
            if (!HOP_HEADERS.contains(header.getKey().toLowerCase()) && !header.getKey().startsWith(":")) {
                exchange.getResponseHeaders().put(header.getKey(), header.getValue());
            }
        }
        send(exchange, answer.statusCode(), answer.body());
    }

    /** The request's body; a 413 above TorchServe's max_request_size, which the inference port would refuse too. */
    private byte[] body(HttpExchange exchange) throws IOException, ClientError {
        try (InputStream in = exchange.getRequestBody()) {
            byte[] body = in.readNBytes(maxRequestSize + 1);
            if (body.length > maxRequestSize) {
                throw new ClientError(413, "The request body is larger than the server's max_request_size ("
                        + maxRequestSize + " bytes): send a smaller image.");
            }
            return body;
        }
    }

    private static void sendError(HttpExchange exchange, int status, String message) throws IOException {
        exchange.getResponseHeaders().set("Content-Type", "application/json");
        send(exchange, status, ProtocolEndpoint.GSON.toJson(ProtocolEndpoint.errorBody(message))
                .getBytes(StandardCharsets.UTF_8));
    }

    private static void send(HttpExchange exchange, int status, byte[] body) throws IOException {
        exchange.sendResponseHeaders(status, body.length == 0 ? -1 : body.length);
        if (body.length > 0) {
            exchange.getResponseBody().write(body);
        }
    }

    private static Refused refused(String why) {
        return new Refused("the console's own address (" + PROPERTY + ") refused, the server stops: " + why);
    }
}
