package tvserve.plugin;

import com.google.gson.GsonBuilder;
import com.google.gson.JsonObject;
import com.google.gson.JsonParser;
import java.io.IOException;
import java.lang.reflect.Field;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.nio.file.StandardCopyOption;
import java.nio.file.attribute.PosixFilePermissions;
import java.security.SecureRandom;
import java.util.Base64;
import java.util.LinkedHashMap;
import java.util.Map;
import org.pytorch.serve.util.ConfigManager;
import org.pytorch.serve.util.TokenAuthorization;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * API keys the operator supplies, installed in place of the random ones TorchServe 0.12 makes at
 * each start, so that every replica accepts the same keys (a Kubernetes Secret mounted as files).
 *
 * <p>TVSERVE_KEYS_DIR names a folder with a file `inference` and/or `management` holding the key
 * (one trailing newline allowed); an API whose file is missing keeps TorchServe's random key.
 * Supplied keys never expire: they rotate when the files change and the server restarts.
 * TorchServe's key_file.json is rewritten with them (mode 0600), so local tools keep reading keys
 * that work. Any doubt (an unreadable, empty, short or blank-containing key, keys with token
 * authorization off, a TorchServe whose fields differ) stops the server: it never starts with
 * random keys the operator did not ask for. No key is ever logged.
 *
 * <p>TorchServe's token API (`/token`, with its own `API` key) would give this one server new random
 * keys, so replicas would stop sharing them; with keys supplied, that API's key is replaced by a
 * random one kept nowhere, and key_file.json says the API is off.
 *
 * <p>TorchServe's ModelServer.main runs TokenAuthorization.init() and then loads this plugin, so
 * the first endpoint constructed installs the keys before any port listens. A refusal propagates out of ModelServer.main,
 * which exits 1.
 */
final class SuppliedKeys {
    static final String DIR_ENV = "TVSERVE_KEYS_DIR";
    static final String[] APIS = {"inference", "management"};
    static final int MIN_LENGTH = 16;
    static final String NEVER = "never"; // key_file.json's "expiration time" of a supplied key
    static final String TOKEN_API_OFF = "off: the keys are supplied (" + DIR_ENV + "); /token would give "
            + "this one server new random keys, so its key is random and kept nowhere";
    private static final Logger logger = LoggerFactory.getLogger(SuppliedKeys.class);
    private static boolean installed;

    private SuppliedKeys() {}

    /** Installs the supplied keys once per process; throws Refused (the server stops) on any doubt. */
    static synchronized void installOnce() {
        if (installed) {
            return;
        }
        installed = true;
        String dir = System.getenv(DIR_ENV);
        if (dir == null || dir.isEmpty()) {
            logger.info("tvserve plugin: API keys are TorchServe's random ones ({} is not set)", DIR_ENV);
            return;
        }
        try {
            install(Paths.get(dir));
        } catch (Refused e) {
            logger.error("tvserve plugin: {}", e.getMessage());
            throw e;
        }
    }

    private static void install(Path dir) {
        Map<String, String> keys = read(dir);
        if (!Boolean.TRUE.equals(TokenAuthorization.isEnabled())) {
            throw refused(DIR_ENV + " supplies keys but token authorization is off "
                    + "(disable_token_authorization=true): unset " + DIR_ENV + " or turn tokens on.");
        }
        Map<String, Path> sources = new LinkedHashMap<>();
        for (Map.Entry<String, String> entry : keys.entrySet()) {
            setStatic(entry.getKey() + "Key", entry.getValue());
            setStatic(entry.getKey() + "ExpirationTimeMinutes", null); // null: TorchServe's check never expires it
            sources.put(entry.getKey(), dir.resolve(entry.getKey()));
        }
        setStatic("apiKey", keptNowhere());
        Path keyFile = Paths.get((String) getStatic("keyFilePath"));
        rewriteKeyFile(keyFile, keys, sources);
        logger.info("tvserve plugin: token API (/token) {}", TOKEN_API_OFF);
        for (String api : APIS) {
            logger.info("tvserve plugin: {} key {}", api,
                    keys.containsKey(api) ? "from " + sources.get(api) + " (no expiry)" : "is TorchServe's random one");
        }
    }

    /** {api: key} for each API whose file is in `dir`; refuses a folder with neither. */
    private static Map<String, String> read(Path dir) {
        if (!Files.isDirectory(dir)) {
            throw refused(DIR_ENV + "=" + dir + " is not a folder: mount the Secret there or unset " + DIR_ENV + ".");
        }
        Map<String, String> keys = new LinkedHashMap<>();
        for (String api : APIS) {
            Path file = dir.resolve(api);
            if (Files.exists(file)) {
                keys.put(api, readKey(file));
            }
        }
        if (keys.isEmpty()) {
            throw refused(DIR_ENV + "=" + dir + " holds neither `inference` nor `management`: name the "
                    + "Secret's keys so (kubectl create secret generic ... --from-literal=inference=...).");
        }
        return keys;
    }

    /** The key in `file`, without its trailing newline; refused when unreadable, empty, short or blank-containing. */
    private static String readKey(Path file) {
        String key;
        try {
            key = Files.readString(file, StandardCharsets.UTF_8).replaceFirst("\r?\n\\z", "");
        } catch (IOException | RuntimeException e) {
            throw refused("cannot read the key in " + file + " (" + e.getClass().getSimpleName()
                    + "): make it readable by the server's user (uid " + uid() + ").");
        }
        if (key.isEmpty()) {
            throw refused("the key in " + file + " is empty: write one of at least " + MIN_LENGTH
                    + " characters (openssl rand -hex 24).");
        }
        if (!key.matches("\\p{Graph}+")) {
            throw refused("the key in " + file + " holds blanks or characters other than printable ASCII, "
                    + "which no Bearer header can carry: use e.g. openssl rand -hex 24.");
        }
        if (key.length() < MIN_LENGTH) {
            throw refused("the key in " + file + " has " + key.length() + " characters, fewer than "
                    + MIN_LENGTH + ": use a longer one (openssl rand -hex 24).");
        }
        return key;
    }

    /** TorchServe's key file with the supplied keys, their "expiration time" "never" and "source" their file. */
    private static void rewriteKeyFile(Path keyFile, Map<String, String> keys, Map<String, Path> sources) {
        try {
            JsonObject content = JsonParser.parseString(Files.readString(keyFile)).getAsJsonObject();
            for (Map.Entry<String, String> entry : keys.entrySet()) {
                JsonObject api = content.getAsJsonObject(entry.getKey());
                api.addProperty("key", entry.getValue());
                api.addProperty("expiration time", NEVER);
                api.addProperty("source", sources.get(entry.getKey()).toString());
            }
            JsonObject tokenApi = new JsonObject();
            tokenApi.addProperty("status", TOKEN_API_OFF);
            content.add("API", tokenApi);
            byte[] text = new GsonBuilder().setPrettyPrinting().create().toJson(content).getBytes(StandardCharsets.UTF_8);
            Path staging = Files.createTempFile(keyFile.getParent(), ".key_file", ".json",
                    PosixFilePermissions.asFileAttribute(PosixFilePermissions.fromString("rw-------")));
            Files.write(staging, text);
            Files.move(staging, keyFile, StandardCopyOption.ATOMIC_MOVE, StandardCopyOption.REPLACE_EXISTING);
        } catch (IOException | RuntimeException e) {
            throw refused("cannot rewrite TorchServe's key file " + keyFile + " with the supplied keys ("
                    + e.getClass().getSimpleName() + "): the server's working directory must be writable.");
        }
    }

    /** A key nobody can present: 32 random bytes, never written or logged. */
    private static String keptNowhere() {
        byte[] bytes = new byte[32];
        new SecureRandom().nextBytes(bytes);
        return Base64.getUrlEncoder().withoutPadding().encodeToString(bytes);
    }

    private static Field field(String name) {
        try {
            Field field = TokenAuthorization.class.getDeclaredField(name);
            field.setAccessible(true);
            return field;
        } catch (ReflectiveOperationException | RuntimeException e) {
            throw refused("this TorchServe (" + torchServeVersion() + ") has no TokenAuthorization." + name
                    + ": supplied keys need TorchServe 0.12's; unset " + DIR_ENV + " or use TorchServe 0.12.");
        }
    }

    private static Object getStatic(String name) {
        try {
            return field(name).get(null);
        } catch (IllegalAccessException e) {
            throw refused("cannot read TokenAuthorization." + name + " in TorchServe " + torchServeVersion() + ".");
        }
    }

    private static void setStatic(String name, Object value) {
        try {
            field(name).set(null, value);
        } catch (IllegalAccessException | IllegalArgumentException e) {
            throw refused("cannot set TokenAuthorization." + name + " in TorchServe " + torchServeVersion()
                    + ": supplied keys need TorchServe 0.12's; unset " + DIR_ENV + ".");
        }
    }

    private static String torchServeVersion() {
        return "version " + ConfigManager.getInstance().getProperty("version", "unknown");
    }

    private static String uid() {
        try {
            return String.valueOf(Files.getAttribute(Paths.get("/proc/self"), "unix:uid"));
        } catch (IOException | RuntimeException e) {
            return System.getProperty("user.name");
        }
    }

    private static Refused refused(String why) {
        return new Refused("supplied API keys refused, the server stops: " + why);
    }
}
