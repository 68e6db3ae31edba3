package tvserve.plugin;

import com.google.gson.JsonArray;
import com.google.gson.JsonObject;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.List;
import java.util.Map;
import java.util.TreeSet;
import java.util.regex.Pattern;
import java.util.stream.Stream;
import tvserve.plugin.ProtocolEndpoint.ClientError;

/**
 * The console page's own files, which hold no secret: index.html, console.js and console.css from
 * the folder TVSERVE_CONSOLE_DIR names, and the sample images and clips from TVSERVE_SAMPLES_DIR's. Served by
 * ConsoleEndpoint (/console on the inference port) and ConsoleAddress (the console's own address,
 * with no key), so both check names and types the same way.
 *
 * <pre>
 * /console/                 index.html
 * /console/{name}           console.js, console.css (any file of a known type in the folder)
 * /console/samples/{name}   one sample image or clip
 * </pre>
 */
final class ConsoleFiles {
    static final String DIR_ENV = "TVSERVE_CONSOLE_DIR"; // the page's files (tvserve/console/)
    static final String SAMPLES_ENV = "TVSERVE_SAMPLES_DIR"; // the sample images and clips, where the checkout has them
    static final String OFF = "the console is off: the server's configuration sets tvserve_console=false, "
            + "or TorchServe was started without `tvserve serve`; set tvserve_console=true and restart";
    static final String CACHE_CONTROL = "no-cache"; // a new tvserve's page is seen at the next load
    static final Pattern FILE_NAME = Pattern.compile("[A-Za-z0-9][A-Za-z0-9_.-]*"); // no path, no dot-file
    static final Map<String, String> TYPES = Map.ofEntries(
            Map.entry("html", "text/html; charset=utf-8"), Map.entry("js", "text/javascript; charset=utf-8"),
            Map.entry("css", "text/css; charset=utf-8"), Map.entry("svg", "image/svg+xml"),
            Map.entry("png", "image/png"), Map.entry("jpg", "image/jpeg"), Map.entry("jpeg", "image/jpeg"),
            Map.entry("webp", "image/webp"), Map.entry("gif", "image/gif"),
            Map.entry("mp4", "video/mp4"), Map.entry("webm", "video/webm")); // clips, for video models

    /** One file to send: its content type and bytes. */
    record Page(String type, byte[] bytes) {}

    private ConsoleFiles() {}

    /** The page's folder; a 404 saying the console is off where it is not set. */
    static Path pageFolder() throws ClientError {
        return folder(DIR_ENV, OFF);
    }

    /**
     * The file a GET of /console/{parts...} asks for (parts as ProtocolEndpoint.segments gives them),
     * or null where the path names no page file (the console's API). A 404 for a name that is not a
     * plain file of a known type in its folder.
     */
    static Page find(List<String> parts) throws ClientError, IOException {
        if (parts.size() > 2 || (parts.size() == 2 && !parts.get(0).equals("samples"))) {
            return null;
        }
        if (parts.size() == 2) {
            return read(folder(SAMPLES_ENV, "this server has no samples folder"), parts.get(1));
        }
        return read(pageFolder(), parts.isEmpty() ? "index.html" : parts.get(0));
    }

    /** The folder the environment variable `env` names; a 404 saying `why` where it names none. */
    static Path folder(String env, String why) throws ClientError {
        String value = System.getenv(env);
        if (value == null || value.isEmpty() || !Files.isDirectory(Paths.get(value))) {
            throw new ClientError(404, "Not available: " + why + ".");
        }
        return Paths.get(value);
    }

    /** `name` from `dir`; a 404 for names that are not a plain file of a known type there. */
    static Page read(Path dir, String name) throws ClientError, IOException {
        String type = TYPES.get(extension(name));
        Path path = dir.resolve(name);
        if (!FILE_NAME.matcher(name).matches() || type == null || !Files.isRegularFile(path)) {
            throw new ClientError(404, "No console file '" + name + "'.");
        }
        return new Page(type, Files.readAllBytes(path));
    }

    /**
     * {"samples": [names]}: the images and clips in the samples folder, sorted; empty where there is
     * none. The page shows each task those that fit it, by their extension.
     */
    static JsonObject samples() throws IOException {
        JsonArray names = new JsonArray();
        String value = System.getenv(SAMPLES_ENV);
        if (value != null && !value.isEmpty() && Files.isDirectory(Paths.get(value))) {
            TreeSet<String> sorted = new TreeSet<>();
            try (Stream<Path> files = Files.list(Paths.get(value))) {
                files.map(path -> path.getFileName().toString())
                        .filter(name -> FILE_NAME.matcher(name).matches() && isSample(name))
                        .forEach(sorted::add);
            }
            sorted.forEach(names::add);
        }
        JsonObject body = new JsonObject();
        body.add("samples", names);
        return body;
    }

    /** An image a model reads (not an SVG drawing) or a clip. */
    static boolean isSample(String name) {
        String type = TYPES.get(extension(name));
        return type != null && (type.startsWith("image/") && !type.startsWith("image/svg") || type.startsWith("video/"));
    }

    private static String extension(String name) {
        return name.substring(name.lastIndexOf('.') + 1).toLowerCase();
    }
}
